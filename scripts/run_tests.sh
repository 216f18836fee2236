#!/usr/bin/env bash
# Runs the test suite from the project's virtual environment.
# pytest exits 5 when it collected no tests; that must fail loudly, never pass.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
# Optional services for integration tests (PostgreSQL); failure to start only skips those tests.
if [ -x scripts/ensure_test_services.sh ]; then
    bash scripts/ensure_test_services.sh || echo "note: optional test services unavailable; their tests will skip"
fi
"$BIN/python" -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"

#!/usr/bin/env bash
# Install everything, then run the whole test suite (unit + integration on the real models).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# The report test renders report.html in a real browser (Debian's chromium).
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "chromium could not be installed; the browser test will be skipped"
fi
# Static checks first (seconds): lint, types, and the one-way layering of the stages.
.venv/bin/ruff check refusaldir tests bench
.venv/bin/mypy refusaldir
.venv/bin/lint-imports
# Everything: unit tests, then the science checks on the real models (about 37 min on 2
# CPU cores, most of it the `heavy` ones). Extra arguments go to pytest, e.g.
# `-m "not integration"` (unit tests only, ~2 min) or `-m "not heavy"`.
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"

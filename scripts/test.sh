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
# Default: everything except the `heavy` science checks, which have not been timed on an idle
# CI machine yet; `bash scripts/test.sh -m heavy` runs those (a later -m wins).
exec .venv/bin/python -m pytest -q -p no:cacheprovider -m "not heavy" "$@"

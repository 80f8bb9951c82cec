#!/usr/bin/env bash
# Regenerate docs/reference/config.md's config-key table from the config dataclasses
# (`convoy config --keys --markdown`); the text around the markers is kept as it is.
# PYTHON picks the interpreter (default: the project's .venv, as `make` sets it up).
set -euo pipefail
cd "$(dirname "$0")/../.."
page=docs/reference/config.md
table="$("${PYTHON:-.venv/bin/python}" -m deploy.cli config --keys --markdown)"
"${PYTHON:-.venv/bin/python}" - "$page" "$table" <<'PY'
import re
import sys
from pathlib import Path

page, table = Path(sys.argv[1]), sys.argv[2]
text = page.read_text()
pattern = r"(<!-- config-keys:start -->\n).*?(<!-- config-keys:end -->)"
if not re.search(pattern, text, flags=re.S):
    sys.exit(f"{page}: the <!-- config-keys:start --> / <!-- config-keys:end --> markers are missing")
text = re.sub(pattern, lambda m: m.group(1) + table + "\n" + m.group(2), text, flags=re.S)
page.write_text(text)
print(f"updated {page}")
PY

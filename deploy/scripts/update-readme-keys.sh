#!/usr/bin/env bash
# Regenerate the README's config-key table from the config dataclasses.
set -euo pipefail
cd "$(dirname "$0")/../.."
table="$(.venv/bin/convoy config --keys --markdown)"
python3 - "$table" <<'PY'
import re, sys
table = sys.argv[1]
text = open("README.md").read()
text = re.sub(r"(<!-- config-keys:start -->\n).*?(<!-- config-keys:end -->)", lambda m: m.group(1) + table + "\n" + m.group(2), text, flags=re.S)
open("README.md", "w").write(text)
PY

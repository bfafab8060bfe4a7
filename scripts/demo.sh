#!/usr/bin/env bash
# Set up (if needed) and run the course's main job: `ssl-course demo` (quick profile: about 1.5 min on 2 CPU cores).
# Extra arguments go to the demo, e.g. `bash scripts/demo.sh --profile full --device cuda`.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ssl-course demo "$@"

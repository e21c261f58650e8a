"""``cloformer-validate`` with the tiny test model registered: what a test runs in a process of its own (to kill it,
or inside a network namespace with a Ray cluster). Arguments are cloformer-validate's."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import register_tiny  # noqa: E402

if __name__ == "__main__":
    register_tiny()
    from cloformer_deploy.cli import validate_main

    sys.exit(validate_main(sys.argv[1:]))

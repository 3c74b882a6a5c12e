"""``python -m lm_eval_telltale`` — lm-eval's CLI with identical flags and the telltale model
types registered (the documented fallback to the ``lm_eval`` console script), or a ``telltale``
subcommand when the first argument names one."""

import sys

from .cli import COMMANDS, main, run_lm_eval

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        sys.exit(main())
    sys.exit(run_lm_eval(sys.argv[1:]))

"""jaxserve-lm-eval: lm-evaluation-harness's own command line, with the `jaxserve` backend.

  jaxserve-lm-eval --model jaxserve --model_args pretrained=DIR --tasks hellaswag ...

Every flag is lm-eval's; this only registers jaxserve's adapter first (lm-eval 0.4 discovers
no third-party models by itself). Needs `pip install 'jaxserve[eval]'`.
"""

from __future__ import annotations

import sys


def run() -> None:
    try:
        import jaxserve.lm_eval_adapter  # noqa: F401  (registers model="jaxserve")
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        sys.exit(f"jaxserve-lm-eval: error: lm-evaluation-harness is not installed ({e}); "
                 f"pip install 'jaxserve[eval]'")
    cli_evaluate()


if __name__ == "__main__":
    run()

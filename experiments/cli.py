"""Command-line behaviour shared by the entry points: short usage errors, quiet CPU start-up.

    if __name__ == "__main__":
        cli.run(main)            # instead of absl's app.run(main)

* A usage error (``app.UsageError`` raised by ``main``, or a flag absl cannot parse) prints
  only ``Error: <message>`` and ``Try --helpshort for the flags.`` on stderr and exits with
  status 1; absl's ``app.run`` would print the module docstring and every flag first.
* On a machine without an accelerator, JAX's backend probe logs an INFO line such as
  ``Unable to initialize backend 'tpu': ... Failed to open libtpu.so`` (absl shows INFO
  records). :func:`quiet_accelerator_probe` drops exactly those records — the quiet failures of
  optional backends, which JAX logs below WARNING — and nothing else: backends are still
  probed and chosen as before (no ``JAX_PLATFORMS`` is set, so a GPU is used when present), and
  JAX's warnings (e.g. a GPU without a CUDA jaxlib) and errors still show.
"""

from __future__ import annotations

import logging
import sys
import textwrap

from absl import app, flags

__all__ = ["run", "quiet_accelerator_probe", "print_usage_error", "HINT"]

HINT = "Try --helpshort for the flags."
#: The logger of JAX's backend initialisation (``jax._src.xla_bridge``).
BACKEND_LOGGER = "jax._src.xla_bridge"


class _QuietProbeFilter(logging.Filter):
    """Drops the below-WARNING "Unable to initialize backend ..." records of optional backends."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.WARNING and str(record.msg).startswith("Unable to initialize backend"))


_FILTER = _QuietProbeFilter()


def quiet_accelerator_probe() -> None:
    """Hide the INFO lines of JAX's probe for absent accelerators (idempotent; see module doc)."""
    logger = logging.getLogger(BACKEND_LOGGER)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)


def print_usage_error(message: str) -> None:
    message = str(message).strip()
    if "\n" in message:
        message = "\n" + textwrap.indent(message, "  ")
    sys.stderr.write(f"Error: {message}\n{HINT}\n")
    sys.stderr.flush()


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        print_usage_error(str(error))
        sys.exit(1)


def run(main, argv=None) -> None:
    """``absl.app.run(main)`` with one-line usage errors and a quiet accelerator probe."""
    quiet_accelerator_probe()

    def main_with_short_usage_errors(args):
        try:
            return main(args)
        except app.UsageError as error:
            print_usage_error(str(error))
            sys.exit(error.exitcode or 1)

    app.run(main_with_short_usage_errors, argv=argv, flags_parser=_parse_flags)


quiet_accelerator_probe()  # also for drivers that call app.run(module.main) after importing an entry point

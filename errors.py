"""Bad input, and how every command reports it: one line on stderr and exit code 2, never a traceback.

Library code raises UsageError for anything a user can fix (a flag, a file, a request field); the
commands end through run_command, and the coming server turns the same error into a 400 response.
"""
import argparse
import sys


class UsageError(Exception):
    """Bad input. `param` names the option or field at fault, where there is one."""

    def __init__(self, message: str, param: str = None):
        super().__init__(message)
        self.param = param


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are UsageErrors: one line, as for every other bad input (argparse's own
    would print its usage block and exit on its own)."""

    def error(self, message):
        raise UsageError(message)


def run_command(main, argv=None) -> int:
    """Run a command's main(argv); bad input becomes one line on stderr and exit code 2."""
    try:
        return main(argv) or 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130

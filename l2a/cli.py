"""What every command-line entry point shares: bad input as one ``error:`` line, and a clean stop on a signal.

    sys.exit(run_command(main, resume_hint="rerun the same command to resume"))

``run_command`` runs ``main()`` and turns

- a ``UserError`` (bad input, settings or endpoint the user can fix) into ``error: <message>`` and exit 2;
- Ctrl-C (SIGINT) or SIGTERM into ``interrupted (SIGINT): <resume hint>`` and exit 128 + the signal number.

Why the signals are installed here, explicitly: a process started as a background job of a non-interactive
shell (``cmd &`` in a script, many CI runners and job launchers) inherits SIGINT as *ignored*. Python keeps it
ignored, and ``asyncio.run`` only installs its Ctrl-C handler over Python's default one, so such a process
went on working after a SIGINT (the ``l2a.data prepare`` hang). SIGTERM, by default, kills without cleanup or
message. Here both raise ``Interrupted`` wherever the main thread is, so ``finally`` blocks run, and every
resumable output of l2a is written record by record, so nothing finished is lost.

``parse_dataclass`` reads a config dataclass from defaults < a YAML file (``--config``) < command-line flags;
``arg`` declares one of its fields with the documentation ``--help`` shows.
"""

from __future__ import annotations

import signal
import sys
import typing
from dataclasses import field, fields
from typing import Callable, TypeVar

import yaml

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class UserError(Exception):
    """A problem the user can fix (bad input, settings, an endpoint that refuses us): one line, no traceback."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which (the exit status is 128 + signum)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def run_command(main: Callable[[], object], resume_hint: str | Callable[[], str]) -> int:
    """Run ``main()``; return the process exit status (0, 2 for a UserError, 128 + signal when interrupted).

    ``resume_hint`` (or a function giving it, read at the moment of the interruption) tells the user what was
    kept and how to continue.
    """
    previous = {signum: signal.signal(signum, _raise_interrupted) for signum in STOP_SIGNALS}
    try:
        main()
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        hint = resume_hint() if callable(resume_hint) else resume_hint
        print(f"interrupted ({signal.Signals(signum).name}): {hint}", file=sys.stderr)
        return 128 + signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def arg(default, help: str):
    """A config field with its documentation (shown by ``--help``)."""
    return field(default=default, metadata={"help": help})


def parse_dataclass(cls: type[T], argv: list[str]) -> T:
    """A ``cls`` instance from its defaults < the YAML file named by ``--config`` < command-line flags.

    Every field is a flag (``--name value``) documented by its ``help`` metadata; ``Literal`` fields accept only
    their values. An unknown key in the YAML file or an unknown flag is a UserError.
    """
    from transformers import HfArgumentParser

    parser = HfArgumentParser(cls)
    parser.add_argument("--config", default=None, help="YAML file of config fields (flags override it).")
    known, _ = parser.parse_known_args(argv)
    if known.config:
        try:
            with open(known.config) as f:
                overrides = yaml.safe_load(f) or {}
        except OSError as err:
            raise UserError(f"{known.config}: cannot read the config file ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise UserError(f"{known.config}: not valid YAML ({err})") from None
        if not isinstance(overrides, dict):
            raise UserError(f"{known.config}: expected a mapping of config fields")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise UserError(f"{known.config}: unknown config keys: {', '.join(unknown)}")
        hints = typing.get_type_hints(cls)
        for key, value in overrides.items():
            allowed = typing.get_args(hints[key]) if typing.get_origin(hints[key]) is typing.Literal else ()
            if allowed and value not in allowed:
                raise UserError(f"{known.config}: {key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        parser.set_defaults(**overrides)
    config, *_, remaining = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True,
                                                               look_for_args_file=False)
    if remaining:
        raise UserError(f"unknown arguments: {' '.join(remaining)} (see --help)")
    return config

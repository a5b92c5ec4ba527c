"""What every command-line tool shares: flag parsing into the tool's own `FlagValues` (so tools
can be imported and run side by side, e.g. in tests), `--help`, subcommands, multi-process
start-up, the runtime line, and user mistakes as one `error:` line with exit status 2. The library
never imports this.

Every tool module has the same shape: `main(argv) -> int` (argv[0] is the program; tests call it
in-process), `run = cli.entry(main)` (the zero-argument function its console script names in
pyproject.toml), and `if __name__ == "__main__": sys.exit(run())` for `python -m`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence

import jax
from absl import flags

from mgd_jax.runtime import logs, parallel
from mgd_jax.runtime.errors import UserError

USER_ERROR = 2


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return USER_ERROR


Body = Callable[[], int | None]
HELP_FLAGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def entry(main: Callable[[Sequence[str]], int]) -> Callable[[], int]:
    """The zero-argument form of a tool's `main(argv)`: what a console script calls (its return
    value is the exit status)."""

    def run() -> int:
        return main(sys.argv)

    run.__doc__ = f"`{main.__module__}.main(sys.argv)`."
    return run


def run(flag_values: flags.FlagValues, argv: Sequence[str], body: Body | Mapping[str, Body], *,
        distributed: bool = False) -> int:
    """Parses `argv` (argv[0] is the program) into `flag_values`, then runs `body()`.

    A mapping `body` names the tool's subcommands: the one positional argument (anywhere among
    the flags, e.g. `mgd-bench step --steps=5`) picks the function to run. Returns the exit
    status: `body`'s (None = 0), 0 after `--help` (the tool's docstring and flags), or 2 for a
    flag or user error. `distributed`: join the multi-process runtime first
    (`parallel.initialize_distributed`).
    """
    if any(arg in HELP_FLAGS for arg in _before_separator(argv[1:])):
        print(usage(flag_values))
        return 0
    flag_values.unparse_flags()  # a second run in one process starts from the defaults
    try:
        extra = flag_values(list(argv))[1:]
    except Exception as e:  # flags.Error, or raised by a config file or a --config.key override
        return _error(flag_error(e, argv))
    if isinstance(body, Mapping):
        try:
            body, extra = _command(body, extra)
        except UserError as e:
            return _error(str(e))
    if extra:
        return _error(f"unexpected arguments: {' '.join(extra)}")
    unloaded = _unloaded_config(flag_values)
    if unloaded:
        return _error(unloaded)
    if not flags.FLAGS.is_parsed():  # grain / orbax read absl's global flags
        flags.FLAGS.mark_as_parsed()
    logs.configure_console()  # the run's own lines and warnings; INFO chatter to log files only
    try:
        if distributed:
            parallel.initialize_distributed()
            logs.say(parallel.runtime_summary(), primary=jax.process_index() == 0)
        status = body()
    except UserError as e:
        return _error(str(e))
    return int(status or 0)


def _before_separator(args: Sequence[str]) -> Sequence[str]:
    return args[:args.index("--")] if "--" in args else args


def _command(commands: Mapping[str, Body], args: list[str]) -> tuple[Body, list[str]]:
    """The subcommand the first positional argument names, and the arguments left."""
    choices = " | ".join(commands)
    if not args:
        raise UserError(f"expected a command: {choices}")
    if args[0] not in commands:
        raise UserError(f"unknown command {args[0]!r}: expected {choices}")
    return commands[args[0]], args[1:]


def usage(flag_values: flags.FlagValues) -> str:
    """`--help`: the docstring of the tool's module (its usage lines) and its flags."""
    doc = ""
    for name in flag_values.flags_by_module_dict():
        module = sys.modules.get(name)
        if module is None and name == sys.argv[0]:  # absl names a `python -m` module by its path
            module = sys.modules.get("__main__")
        if module is not None and module.__doc__:
            doc = module.__doc__.strip()
            break
    # absl heads each module's flags with its name; the flags are indented under it
    listed = [line for line in flag_values.get_help(include_special_flags=False).splitlines()
              if line.startswith(" ")]
    return "\n\n".join(part for part in (doc, "\n".join(["flags:", *listed])) if part)


def _innermost(error: BaseException) -> BaseException:
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return error


def _lines(error: BaseException) -> list[str]:
    return [line.strip() for line in str(error).strip().splitlines() if line.strip()]


def flag_error(error: BaseException, argv: Sequence[str]) -> str:
    """The one useful line of a flag-parsing error: the innermost exception (ml_collections wraps
    a config file's error in a traceback text), named by the flag it came from."""
    first = (_lines(error) or [type(error).__name__])[0]
    inner = _innermost(error)
    if isinstance(inner, (KeyError, AttributeError)):  # --config.<unknown field>=...
        key = str(inner).strip("\"' ")
        for arg in argv:
            name = arg.split("=", 1)[0]
            if name.startswith("--") and "." in name and key in name.split(".")[1:]:
                return f"{name}: unknown config field {key!r}"
    known = isinstance(inner, (flags.Error, UserError))
    if inner is error:
        return first if known else f"{type(error).__name__}: {first}"
    detail = (_lines(inner) or [""])[0]
    if detail in first:
        return first
    if not known:
        detail = f"{type(inner).__name__}: {detail}"
    prefix = first.split("Error whilst parsing")[0].rstrip(": ")
    return f"{prefix}: {detail}" if prefix else detail


def _unloaded_config(flag_values: flags.FlagValues) -> str | None:
    """The error of a config file flag whose file could not be loaded (ml_collections defers it
    to the first use of the config)."""
    for name in flag_values:
        value = flag_values[name].value
        error = getattr(value, "_error", None) if type(value).__name__ == "_ErrorConfig" else None
        if error is not None:
            return f"--{name}: cannot load the config file: {_lines(error)[-1]}"
    return None


def parse_step(text: str | None) -> int | str | None:
    """--step: None, "latest", "best" or a step number."""
    if text is None or text in ("latest", "best"):
        return text
    try:
        return int(text)
    except ValueError:
        raise UserError(f"--step={text}: expected latest, best or a step number") from None


def parse_floats(name: str, values: Sequence[str]) -> tuple[float, ...]:
    """A comma-separated list flag of positive numbers (e.g. --scales=0.75,1,1.25)."""
    try:
        numbers = tuple(float(v) for v in values)
    except ValueError:
        numbers = ()
    if not numbers or min(numbers) <= 0:
        raise UserError(f"--{name}={','.join(values)}: expected positive numbers, e.g. 0.75,1,1.25")
    return numbers

"""One context for every ``rebuild`` command group: consoles, JSON mode, error words, exit codes.

As hatch's one ``Application`` object: :func:`starter.cli.main` makes one :class:`Cli` and hands it to
Typer as the context object; every command of every group (``rebuild``, ``rebuild fleet``, ``rebuild
cache``) gets it with :meth:`Cli.of`. ``--json`` sets its JSON mode while click parses that option,
so nothing reads ``sys.argv`` a second time. Every command ends in :meth:`Cli.run` or :meth:`Cli.fail`:
an error, a usage error included, is one JSON object on stdout under ``--json``, else one line on
stderr, and its exit code comes from the one table (:mod:`common.exit_codes`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from common.exit_codes import ExitCode, leave
from common.exit_codes import table as exit_code_table
from common.help import HelpCommand, HelpGroup

if TYPE_CHECKING:  # the models, pydantic and temporalio load when a command's work needs them
    from pydantic import BaseModel

    from starter.errors import Words
    from workflows.fleet_models import FleetReport
    from workflows.models import RebuildResult

EXIT_CODES_HELP = "Exit codes (every command):\n\n" + exit_code_table()
# What a command exits with for each way a workflow can be; anything else ended without a result.
EXIT_FOR_WORKFLOW_STATUS = {
    "RUNNING": ExitCode.OK,
    "COMPLETED": ExitCode.OK,
    "FAILED": ExitCode.FAILED,
    "TERMINATED": ExitCode.ENDED_WITHOUT_RESULT,
    "CANCELED": ExitCode.ENDED_WITHOUT_RESULT,
    "TIMED_OUT": ExitCode.ENDED_WITHOUT_RESULT,
}
CommandFunction = TypeVar("CommandFunction", bound=Callable[..., Any])


def exit_for_workflow(workflow_status: str) -> ExitCode:
    """``rebuild status``: 0 while it runs and once it completed, 1 failed, 4 ended without a result."""
    return EXIT_FOR_WORKFLOW_STATUS.get(workflow_status, ExitCode.ENDED_WITHOUT_RESULT)


def exit_for_rebuild(workflow_status: str, result: RebuildResult | None) -> ExitCode:
    """``start --wait`` and ``watch``: as :func:`exit_for_workflow`, and 2 when the request was wrong."""
    from starter.rebuilds import BAD_INPUT_TYPES

    code = exit_for_workflow(workflow_status)
    if code == ExitCode.FAILED and result is not None and result.error_type in BAD_INPUT_TYPES:
        return ExitCode.BAD_INPUT
    return code


def exit_for_fleet(workflow_status: str, report: FleetReport | None) -> ExitCode:
    """A fleet that completed is a success only when nothing failed and nothing stopped it."""
    unfinished = report is None or report.stop_reason is not None or report.counts.failures > 0
    if workflow_status == "COMPLETED" and unfinished:
        return ExitCode.FAILED
    return exit_for_workflow(workflow_status)


# The option that sets each request field, where its name is not the field's with dashes: the same
# for `rebuild start` and `rebuild fleet start`.
OPTION_FOR_FIELD = {
    "instance": "INSTANCE",
    "image_url": "--image",
    "glance_url": "--glance",
    "glance_image_id": "--glance-image",
    "snapshot_id": "--snapshot",
    "start_after": "--start/--no-start",
    "stop_timeout_seconds": "--stop-timeout",
    "boot_timeout_seconds": "--boot-timeout",
    "approval_timeout_seconds": "--approval-timeout",
    "confirm_within_seconds": "--confirm-within",
    "preflight": "--preflight/--no-preflight",
    "batch_size": "--batch",
    "pause_between_seconds": "--pause-between",
    "name_pattern": "--select",
    "instances": "--instances-file",
    "hosts": "--host",
}


def option_for(field: str) -> str:
    """How the CLI names a request's field: the option that sets it."""
    return OPTION_FOR_FIELD.get(field, f"--{field.replace('_', '-')}")


def cli_words() -> Words:
    """A refusal as the operator reads it: where to look is a command, an input is an option."""
    from starter.errors import Words

    return Words(
        field=option_for,
        rebuild=lambda host, instance: f"rebuild status {instance} --host {host}",
        fleet=lambda name: f"rebuild fleet status {name}",
    )


def _console(stderr: bool = False) -> Console:
    # No emoji codes: an operator's text (":a:" in a name) is printed as it is, and rich's emoji table
    # (80 ms to import on a loaded machine) stays unloaded.
    return Console(stderr=stderr, highlight=False, soft_wrap=True, emoji=False)


@dataclass
class Cli:
    """What every command shares: where output goes, whether it is JSON, how it ends."""

    json: bool = False
    # How error lines begin: the command group's name (``rebuild fleet`` sets its own).
    who: str = "rebuild"
    out: Console = field(default_factory=_console)
    err: Console = field(default_factory=lambda: _console(stderr=True))

    @classmethod
    def of(cls, ctx: typer.Context) -> Cli:
        return ctx.ensure_object(cls)

    def say(self, text: str) -> None:
        self.out.print(text, markup=False)

    def complain(self, text: str) -> None:
        """A line on stderr, named after the command group: an error, a refusal."""
        self.err.print(f"{self.who}: {text}", markup=False)

    def print_json(self, document: BaseModel | list[Any] | dict[str, Any]) -> None:
        text = json.dumps(document) if isinstance(document, list | dict) else document.model_dump_json()
        print(text, flush=True)

    def error(self, code: int, message: str) -> None:
        if self.json:
            self.print_json({"error": message, "exit_code": code})
        else:
            self.complain(message)

    def fail(self, code: int, message: str) -> NoReturn:
        self.error(code, message)
        leave(code)

    def answered(self, answer: BaseModel, accepted: bool, said: str, refusal: str) -> ExitCode:
        """An update's answer (abort, pause, ...): 0 accepted, 1 refused, in JSON the answer itself."""
        if self.json:
            self.print_json(answer)
        elif accepted:
            self.say(said)
        else:
            self.complain(refusal)
        return ExitCode.OK if accepted else ExitCode.FAILED

    def listing(self, rows: Sequence[BaseModel], columns: Sequence[str]) -> ExitCode:
        """A list command's answer: the rows as JSON, or a table of their ``columns``."""
        if self.json:
            self.print_json([row.model_dump(mode="json") for row in rows])
            return ExitCode.OK
        from rich.table import Table

        table = Table(*columns, box=None)
        for row in rows:
            table.add_row(*(str(getattr(row, column)) for column in columns))
        self.out.print(table)
        return ExitCode.OK

    @contextlib.contextmanager
    def following(self, instance: str, host: str, workflow_id: str) -> Iterator[None]:
        """Following a rebuild (``start --wait``, ``watch``): Ctrl-C stops the following, never the
        rebuild, and says so, with how to follow it again and how to abort it (then exit 130)."""
        import asyncio

        try:
            yield
        except (asyncio.CancelledError, KeyboardInterrupt):
            target = f"{instance} --host {host}"
            self.error(
                ExitCode.INTERRUPTED,
                f"interrupted; the rebuild goes on (workflow {workflow_id}). Follow it: rebuild watch "
                f"{target} (or rebuild status {target}); abort it: rebuild abort {target} --reason TEXT",
            )
            raise

    @contextlib.contextmanager
    def refusing(self, what: str) -> Iterator[None]:
        """Options turned into a request: one that cannot be used exits 2, before anything starts."""
        try:
            yield
        except Exception as exc:  # pydantic's, an unreadable instances file, a duration, an identity option
            refused = _refusal(exc, f"invalid {what}: ")
            if refused is None:
                raise
            self.fail(*refused)

    def run(self, work: Coroutine[Any, Any, int]) -> NoReturn:
        """Run a command's work and leave with its code, or with the code of what stopped it."""
        import asyncio

        try:
            code = asyncio.run(work)
        except KeyboardInterrupt:
            leave(ExitCode.INTERRUPTED)
        except Exception as exc:
            ending = _refusal(exc) or _temporal_ending(exc)
            if ending is None:
                raise
            self.fail(*ending)
        leave(code)


def _refusal(exc: Exception, validation_prefix: str = "") -> tuple[int, str] | None:
    """Exit 2 and the words for a request that cannot be used (pydantic's refusal, the service's, a
    ValueError), None for anything else. Imported here: the work that raised it loaded them already."""
    from pydantic import ValidationError

    from starter.errors import ServiceError, validation_problems

    if isinstance(exc, ServiceError):
        return ExitCode.BAD_INPUT, exc.said_with(cli_words())
    if isinstance(exc, ValidationError):
        return ExitCode.BAD_INPUT, validation_prefix + validation_problems(exc, option_for)
    if isinstance(exc, ValueError):
        return ExitCode.BAD_INPUT, str(exc)
    return None


def _temporal_ending(exc: Exception) -> tuple[int, str] | None:
    """Temporal unreachable (3) or refusing the call (an unknown namespace, a denied API key: 1), in
    its own words and without a traceback; None for anything else."""
    from temporalio.service import RPCError, RPCStatusCode

    from common.connection import TemporalUnavailable

    if isinstance(exc, TemporalUnavailable):
        return ExitCode.UNAVAILABLE, str(exc)
    if isinstance(exc, RPCError):
        down = exc.status in (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED)
        return ExitCode.UNAVAILABLE if down else ExitCode.FAILED, f"Temporal: {exc.message}"
    return None


def _json_mode(ctx: typer.Context, value: bool) -> bool:
    if value:
        Cli.of(ctx).json = True
    return value


# Eager, so the JSON mode is known before any other option of the command is checked. The command's
# own parameter only declares the option: its value lives in the command's Cli.
JsonOption = Annotated[
    bool, typer.Option("--json", help="Machine-readable output.", is_eager=True, callback=_json_mode)
]
AddressOption = Annotated[
    str | None,
    typer.Option(help="Temporal address; default from TEMPORAL_ADDRESS / envconfig, else localhost:7233."),
]


def _usage_error(exc: Exception) -> tuple[int, str] | None:
    """Exit code and message of one of click's usage errors (Typer vendors click; not public)."""
    code, describe = getattr(exc, "exit_code", None), getattr(exc, "format_message", None)
    return (code, str(describe())) if isinstance(code, int) and callable(describe) else None


class CliCommand(HelpCommand):
    """A command whose usage errors come out as JSON under its ``--json``.

    An error found while options are checked comes after ``--json`` was read (it is eager). One found
    while the line is split into options (an unknown option) comes before: the command's own parser
    reads the line once more, skipping what it does not know, to learn whether ``--json`` is among it.
    """

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        given = list(args)
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:
            usage = _usage_error(exc)
            cli = Cli.of(ctx)
            if usage is not None and (cli.json or self._asks_for_json(ctx, given)):
                cli.json = True
                cli.fail(*usage)
            raise

    def _asks_for_json(self, ctx: Any, given: list[str]) -> bool:
        names = [p.name for p in self.params if "--json" in getattr(p, "opts", ())]
        parser = self.make_parser(ctx)
        parser.ignore_unknown_options = True
        try:
            options, _, _ = parser.parse_args(args=list(given))
        except Exception:
            return "--json" in given  # not even that parses (an option without its value)
        return any(options.get(name) for name in names if name)


class CliGroup(HelpGroup):
    """A command group whose usage errors (an unknown command or option) come out as JSON when the
    rest of the line asks for it: no command's parser has read that rest, so its ``--json`` is a word."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        given = list(args)
        try:
            return super().parse_args(ctx, args)
        except Exception as exc:
            self._fail_as_json(ctx, exc, given)
            raise

    def resolve_command(self, ctx: Any, args: list[str]) -> tuple[str | None, Any, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except Exception as exc:
            self._fail_as_json(ctx, exc, args)
            raise

    @staticmethod
    def _fail_as_json(ctx: Any, exc: Exception, given: list[str]) -> None:
        usage = _usage_error(exc)
        cli = Cli.of(ctx)
        if usage is not None and (cli.json or "--json" in given):
            cli.json = True
            cli.fail(*usage)


def command(
    group: typer.Typer, name: str | None = None, epilog: str | None = EXIT_CODES_HELP
) -> Callable[[CommandFunction], CommandFunction]:
    """Register a command on a group, with the exit-code table in its help and JSON usage errors."""
    return group.command(name, cls=CliCommand, epilog=epilog)


def command_group(help: str, epilog: str | None = EXIT_CODES_HELP) -> typer.Typer:
    """A group of commands (``rebuild``, ``rebuild fleet``, ...) whose usage errors follow ``--json``."""
    return typer.Typer(cls=CliGroup, no_args_is_help=True, help=help, epilog=epilog)

"""How the ``rebuild`` CLI reaches Temporal: the connection options the ``temporal`` CLI has, by the
same names, each also read from the environment variable ``temporalio.envconfig`` uses; and which
hypervisor a command means (``--host``, ``REBUILD_HOST``).

A flag wins over its environment variable, which wins over the profile in the config file
(``--profile``, ``--config-file``): the flags are handed to envconfig as those variables, so there is
one way settings are resolved, the SDK's.
"""

from __future__ import annotations

import os
import socket
from typing import Annotated

import typer

PACKAGE = "durable-rebuild"
# The options the `temporal` CLI has, by its names; each also read from envconfig's variable.
CONNECTION_PANEL = "Temporal connection (as the temporal CLI's)"
TLS_PANEL = "TLS details (as the temporal CLI's)"
THIS_HOST = socket.gethostname()
# Every command about one instance takes its hypervisor the same way (docs/cli.md: REBUILD_HOST).
HostOption = Annotated[
    str,
    typer.Option(
        envvar="REBUILD_HOST", help="Hypervisor host of the instance (its worker polls rebuild-host-HOST)."
    ),
]
# Commands that find the host when none is given: the one host whose worker lists the instance
# (``rebuild start``), or the host of its rebuilds (``status``, ``watch``, ``abort``, ...).
FoundHostOption = Annotated[
    str | None,
    typer.Option(
        envvar="REBUILD_HOST",
        show_default=False,
        help="Hypervisor host of the instance (its worker polls rebuild-host-HOST); default: the one "
        "host that has it.",
    ),
]
# What a request is checked with before its host is found (never sent).
HOST_TO_BE_FOUND = "host-to-be-found"


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # email, zipfile, csv: only for --version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        return "unknown (not installed)"


def _show_version(value: bool) -> None:
    if value:
        print(f"rebuild ({PACKAGE}) {package_version()}")
        raise typer.Exit(0)


def _grpc_meta(pairs: list[str] | None) -> list[str] | None:
    for pair in pairs or ():
        key, sep, _ = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, not {pair!r}", param_hint="--grpc-meta")
    return pairs


def connection_options(
    address: Annotated[
        str | None,
        typer.Option(
            envvar="TEMPORAL_ADDRESS",
            help="Temporal frontend, host:port (default localhost:7233).",
            rich_help_panel=CONNECTION_PANEL,
        ),
    ] = None,
    namespace: Annotated[
        str | None,
        typer.Option(
            "--namespace",
            "-n",
            envvar="TEMPORAL_NAMESPACE",
            help="Temporal namespace.",
            rich_help_panel=CONNECTION_PANEL,
        ),
    ] = None,
    profile: Annotated[
        str | None,
        typer.Option(
            envvar="TEMPORAL_PROFILE",
            help="Profile in the envconfig TOML file.",
            rich_help_panel=CONNECTION_PANEL,
        ),
    ] = None,
    config_file: Annotated[
        str | None,
        typer.Option(
            envvar="TEMPORAL_CONFIG_FILE",
            help="The envconfig TOML file.",
            rich_help_panel=CONNECTION_PANEL,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="TEMPORAL_API_KEY",
            help="API key (implies TLS).",
            show_default=False,
            rich_help_panel=CONNECTION_PANEL,
        ),
    ] = None,
    tls: Annotated[
        bool | None,
        typer.Option(
            "--tls/--no-tls",
            envvar="TEMPORAL_TLS",
            help="Connect with TLS.",
            rich_help_panel=CONNECTION_PANEL,
        ),
    ] = None,
    tls_cert_path: Annotated[
        str | None,
        typer.Option(
            envvar="TEMPORAL_TLS_CLIENT_CERT_PATH",
            help="Client certificate (mTLS).",
            rich_help_panel=TLS_PANEL,
            metavar="FILE",
        ),
    ] = None,
    tls_key_path: Annotated[
        str | None,
        typer.Option(
            envvar="TEMPORAL_TLS_CLIENT_KEY_PATH",
            help="Client private key (mTLS).",
            rich_help_panel=TLS_PANEL,
            metavar="FILE",
        ),
    ] = None,
    tls_ca_path: Annotated[
        str | None,
        typer.Option(
            envvar="TEMPORAL_TLS_SERVER_CA_CERT_PATH",
            help="CA of the server.",
            rich_help_panel=TLS_PANEL,
            metavar="FILE",
        ),
    ] = None,
    tls_server_name: Annotated[
        str | None,
        typer.Option(
            envvar="TEMPORAL_TLS_SERVER_NAME",
            help="Server name to verify.",
            rich_help_panel=TLS_PANEL,
            metavar="NAME",
        ),
    ] = None,
    tls_disable_host_verification: Annotated[
        bool,
        typer.Option(
            "--tls-disable-host-verification",
            envvar="TEMPORAL_TLS_DISABLE_HOST_VERIFICATION",
            help="Skip the server name check.",
            rich_help_panel=TLS_PANEL,
        ),
    ] = False,
    grpc_meta: Annotated[
        list[str] | None,
        typer.Option(
            callback=_grpc_meta,
            help="gRPC metadata KEY=VALUE on every call (repeatable).",
            rich_help_panel=CONNECTION_PANEL,
        ),
    ] = None,
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Rebuild KVM/libvirt instances durably through Temporal."""
    given: dict[str, str | None] = {
        "TEMPORAL_ADDRESS": address,
        "TEMPORAL_NAMESPACE": namespace,
        "TEMPORAL_PROFILE": profile,
        "TEMPORAL_CONFIG_FILE": config_file,
        "TEMPORAL_API_KEY": api_key,
        "TEMPORAL_TLS": None if tls is None else str(tls).lower(),
        "TEMPORAL_TLS_CLIENT_CERT_PATH": tls_cert_path,
        "TEMPORAL_TLS_CLIENT_KEY_PATH": tls_key_path,
        "TEMPORAL_TLS_SERVER_CA_CERT_PATH": tls_ca_path,
        "TEMPORAL_TLS_SERVER_NAME": tls_server_name,
        "TEMPORAL_TLS_DISABLE_HOST_VERIFICATION": "true" if tls_disable_host_verification else None,
    }
    for pair in grpc_meta or ():
        key, _, value = pair.partition("=")
        given[f"TEMPORAL_GRPC_META_{key.upper().replace('-', '_')}"] = value
    for name, setting in given.items():
        if setting is not None:
            os.environ[name] = setting

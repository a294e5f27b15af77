"""What compute serves, from its settings, checked before anything starts.

The operation modules are the built-in ones plus `extra_operation_modules`; the job-type
modules likewise. Every mistake here stops start-up with a `ConfigError` naming the setting:
- a module that cannot be imported;
- an operation whose RPC is in no loaded proto;
- an RPC of a served service (one with at least one operation) that has no operation, unless
  it is listed in `unserved_methods` (a user who means to serve part of a service says so);
- a name in `unserved_methods` that is no RPC, or that has an operation after all.

Without the second check, a forgotten module shows only as 501s at call time.
"""

from __future__ import annotations

from google.protobuf import descriptor_pool

from compute import registry
from compute.registry import Operation
from compute.settings import ComputeSettings
from offload.config import ConfigError, import_modules

PREFIX = "OFFLOAD_COMPUTE_"
BUILTIN_SERVICE = "offload.v1.ComputeService"


def operations(settings: ComputeSettings) -> dict[str, Operation]:
    """The operations to serve, by full method name; raises ConfigError."""
    _import(settings, "operation_modules", "extra_operation_modules")
    _import(settings, "job_type_modules", "extra_job_type_modules")
    try:
        found = registry.collect(settings.served_operation_modules)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    lines = [*_unknown(found), *_unserved(found, settings), *_bad_exemptions(found, settings)]
    if lines:
        raise ConfigError(lines)
    return found


def _import(settings: ComputeSettings, builtin: str, extra: str) -> None:
    lines = []
    for field in (builtin, extra):
        try:
            import_modules(getattr(settings, field), f"{PREFIX}{field.upper()}")
        except ConfigError as exc:
            lines += exc.lines
    if lines:
        raise ConfigError(lines)


def _unknown(found: dict[str, Operation]) -> list[str]:
    pool = descriptor_pool.Default()
    lines = []
    for name, op in found.items():
        try:
            pool.FindMethodByName(name)
        except KeyError:
            lines.append(
                f"{name} (operation {op.fn.__module__}.{op.fn.__qualname__}) is no RPC in the loaded protos: "
                "check the name (package.Service.Method), regenerate the code, and import its *_pb2 module in the operation's module"
            )
    return lines


def _unserved(found: dict[str, Operation], settings: ComputeSettings) -> list[str]:
    pool = descriptor_pool.Default()
    services = sorted({name.rpartition(".")[0] for name in found})
    lines = []
    for service_name in services:
        try:
            service = pool.FindServiceByName(service_name)
        except KeyError:
            continue  # _unknown names it
        for method in service.methods:
            if method.full_name not in found and method.full_name not in settings.unserved_methods:
                where = (
                    "compute/operations.py" if service_name == BUILTIN_SERVICE
                    else f"a module listed in {PREFIX}EXTRA_OPERATION_MODULES (now {settings.extra_operation_modules})"
                )
                lines.append(
                    f"{method.full_name} has no operation: define it with @light/@heavy(\"{method.full_name}\") in {where}, "
                    f"or list it in {PREFIX}UNSERVED_METHODS to serve {service_name} without it"
                )
    return lines


def _bad_exemptions(found: dict[str, Operation], settings: ComputeSettings) -> list[str]:
    pool = descriptor_pool.Default()
    lines = []
    for name in settings.unserved_methods:
        try:
            pool.FindMethodByName(name)
        except KeyError:
            lines.append(f"{PREFIX}UNSERVED_METHODS lists {name!r}, which is no RPC in the loaded protos (package.Service.Method)")
            continue
        if name in found:
            lines.append(f"{PREFIX}UNSERVED_METHODS lists {name!r}, which has an operation: remove it from the list")
    return lines

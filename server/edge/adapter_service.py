"""AdapterService, the gRPC servicer of per-request adapters (issue 21), over the edge's AdapterRegistry
(adapters.py) and the engine pool; registered by app.py behind TokenAuth like every RPC.

    LoadAdapter / UnloadAdapter   FAILED_PRECONDITION unless the server runs with --allow-adapter-loading
                                  (or when its backend has no adapter slots); otherwise the registry's
                                  load/unload, shielded: a client that stops waiting does not stop the
                                  engines half-way.
    ListAdapters                  always answers (it says whether loading is allowed; GetModelInfo lists
                                  the adapters anyway).
Requests arrive as bytes and are parsed here (bad bytes: INVALID_ARGUMENT), as in service.py.
"""

from __future__ import annotations

import asyncio
from typing import Any, NoReturn

import grpc
from lcmserve.v1 import generation_pb2 as pb

from ..config import AdapterConfig
from . import convert
from .adapters import AdapterRegistry
from .core import EdgeCore
from .pool import EnginePool
from .status import Refusal, Refused, Status
from .validation import UndecodableRequest, adapters_off_reason, parse

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["AdapterService"].full_name


async def _abort(context: grpc.aio.ServicerContext[Any, Any], refusal: Refusal) -> NoReturn:
    status = convert.status(refusal)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("context.abort returned")  # (it raises)


class AdapterService:
    """lcmserve.v1.AdapterService over the core's registry and engine pool."""

    def __init__(self, core: EdgeCore, config: AdapterConfig) -> None:
        self.core = core
        self.config = config

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's handlers; requests arrive as bytes and are parsed here (bad bytes: INVALID_ARGUMENT)."""
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "LoadAdapter": grpc.unary_unary_rpc_method_handler(
                self.LoadAdapter, response_serializer=pb.LoadAdapterResponse.SerializeToString),
            "UnloadAdapter": grpc.unary_unary_rpc_method_handler(
                self.UnloadAdapter, response_serializer=pb.UnloadAdapterResponse.SerializeToString),
            "ListAdapters": grpc.unary_unary_rpc_method_handler(
                self.ListAdapters, response_serializer=pb.ListAdaptersResponse.SerializeToString),
        })

    def _ready(self, changes: bool) -> tuple[AdapterRegistry, EnginePool]:
        """The registry and the engines; Refused FAILED_PRECONDITION for a change without
        --allow-adapter-loading, UNAVAILABLE while loading or once dead."""
        if changes and not self.config.allow_loading:
            raise Refused(Refusal(Status.FAILED_PRECONDITION, "this server does not load or unload adapters: start "
                                  "it with --allow-adapter-loading (its adapters: serve --adapter NAME=SRC)"))
        served = self.core.model()  # UNAVAILABLE while the model loads, or once the engine died
        registry, pool = self.core.adapters, self.core.engine
        if registry is None or pool is None:
            raise Refused(Refusal(Status.UNAVAILABLE, "the model is still loading"))
        off = adapters_off_reason(served.info.model)
        if changes and off is not None:  # (with --allow-adapter-loading: a backend without slots)
            raise Refused(Refusal(Status.FAILED_PRECONDITION, f"this server cannot load adapters: {off}"))
        return registry, pool

    async def LoadAdapter(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> pb.LoadAdapterResponse:
        try:
            request = parse(raw, pb.LoadAdapterRequest)
            registry, pool = self._ready(changes=True)
            scale = request.scale if request.HasField("scale") else None
            # Shielded: a client that stops waiting does not stop the engines half-way.
            load = asyncio.ensure_future(registry.load(pool, request.name, request.source, scale))
            record = await asyncio.shield(load)
            return pb.LoadAdapterResponse(adapter=convert.adapter_info(record))
        except UndecodableRequest as exc:
            await _abort(context, Refusal(Status.INVALID_ARGUMENT, f"invalid request: {exc}"))
        except Refused as exc:
            if self.core.metrics is not None and exc.refusal.status in (Status.FAILED_PRECONDITION,
                                                                         Status.UNAVAILABLE):
                self.core.metrics.adapter_loads.labels(status=exc.refusal.status.name).inc()
            await _abort(context, exc.refusal)

    async def UnloadAdapter(self, raw: bytes,
                            context: grpc.aio.ServicerContext[Any, Any]) -> pb.UnloadAdapterResponse:
        try:
            request = parse(raw, pb.UnloadAdapterRequest)
            registry, pool = self._ready(changes=True)
            await asyncio.shield(asyncio.ensure_future(registry.unload(pool, request.name)))
            return pb.UnloadAdapterResponse()
        except UndecodableRequest as exc:
            await _abort(context, Refusal(Status.INVALID_ARGUMENT, f"invalid request: {exc}"))
        except Refused as exc:
            if self.core.metrics is not None and exc.refusal.status in (Status.FAILED_PRECONDITION,
                                                                         Status.UNAVAILABLE):
                self.core.metrics.adapter_unloads.labels(status=exc.refusal.status.name).inc()
            await _abort(context, exc.refusal)

    async def ListAdapters(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListAdaptersResponse:
        try:
            parse(raw, pb.ListAdaptersRequest)
            registry, _ = self._ready(changes=False)
            return pb.ListAdaptersResponse(adapters=[convert.adapter_info(r) for r in registry.records()],
                                           free_slots=registry.free_slots, loading_allowed=self.config.allow_loading)
        except UndecodableRequest as exc:
            await _abort(context, Refusal(Status.INVALID_ARGUMENT, f"invalid request: {exc}"))
        except Refused as exc:
            await _abort(context, exc.refusal)

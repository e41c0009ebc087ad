"""``/v1/keys`` (admin): create (the key is shown once), list, delete."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request, Response
from ulid import ULID

from genq.api import routing
from genq.api.auth import Principal, generate_key, hash_key
from genq.api.deps import admin
from genq.api.errors import not_found
from genq.api.schemas import KeyCreate, KeyCreated, KeyPublic, iso
from genq.models import ApiKey

router = routing.router(prefix="/v1/keys", tags=["keys"])


def key_public(k: ApiKey) -> dict[str, Any]:
    return {"id": k.id, "name": k.name, "prefix": k.prefix, "tier": k.tier, "admin": k.admin,
            "max_queued": k.max_queued, "created_at": iso(k.created_at)}


@router.post("", status_code=201, response_model=KeyCreated)
async def create_key(req: KeyCreate, request: Request, _: Principal = Depends(admin)) -> Any:
    raw = generate_key()
    record = ApiKey(id=str(ULID()), name=req.name, key_hash=hash_key(raw), prefix=raw[:8], tier=req.tier,
                    admin=req.admin, max_queued=req.max_queued)
    await request.app.state.runtime.keys.create_key(record)
    return {**key_public(record), "key": raw}


@router.get("", response_model=dict[str, list[KeyPublic]])
async def list_keys(request: Request, _: Principal = Depends(admin)) -> Any:
    return {"keys": [key_public(k) for k in await request.app.state.runtime.keys.list_keys()]}


@router.delete("/{key_id}", status_code=204)
async def delete_key(key_id: str, request: Request, _: Principal = Depends(admin)) -> Response:
    if not await request.app.state.runtime.keys.delete_key(key_id):
        raise not_found("key")
    request.app.state.auth.invalidate()
    return Response(status_code=204)

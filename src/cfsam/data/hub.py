"""Data sets from the Hugging Face Hub where the mirror has none: ``hub.fields`` map each Hub schema to the mirror's."""
from __future__ import annotations

import os
from functools import lru_cache

import datasets
import jinja2

from cfsam.data.catalog import DataError, DataUnavailable, dataset_spec, llamacpp_clean


def hub_spec(name: str) -> dict:
    hub = dataset_spec(name).get("hub", {})
    if "id" not in hub:
        raise DataUnavailable(f"dataset {name!r} has no Hugging Face Hub copy ({hub.get('missing', 'none registered')}); "
                        "set CFSAM_DATA_DIR to a data mirror that holds it")
    return hub


def hub_ref(name: str, split: str | None = None) -> str:
    """``<id>[/<config>][:<split>]``: where a set (one split of it) comes from on the Hub."""
    hub = hub_spec(name)
    return hub["id"] + (f"/{hub['config']}" if hub.get("config") else "") + (f":{split}" if split else "")


def load_hub(name: str, split: str) -> datasets.Dataset:
    """One split of a set's Hub copy, or DataUnavailable saying how to get the set another way."""
    hub = hub_spec(name)
    kwargs = {"revision": hub["revision"]} if "revision" in hub else {}
    if "file" in hub:
        kwargs["data_files"] = hub["file"]
    try:
        no_network = _no_network()
        if no_network:
            raise ConnectionError(no_network)
        return datasets.load_dataset(hub["id"], hub.get("config"), split=split, **kwargs)
    except Exception as err:  # offline, unknown id or split, a loading script datasets no longer runs, ...
        msg = (str(err).strip().splitlines() or [""])[0][:300]
        raise DataUnavailable(f"dataset {name!r}: cannot read {hub_ref(name, split)} from the Hugging Face Hub "
                              f"({type(err).__name__}: {msg}); set CFSAM_DATA_DIR to a local data mirror (laid out "
                              "as its MANIFEST.md says) or allow Hub access (network; HF_HUB_OFFLINE and "
                              "HF_DATASETS_OFFLINE unset)") from err


@lru_cache(maxsize=1)
def _no_network() -> str | None:
    """Why the Hub's host cannot be reached, asked once per process; None when it can, or when the Hub is read
    offline (HF_HUB_OFFLINE: the local HF cache only). Without it a machine with no network spends half a
    minute of retries per data set before the same error."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=10).close()
        return None
    except OSError as err:
        return f"no network: {url.hostname} cannot be reached ({err})"


def hub_records(name: str, split: str) -> list[dict]:
    return _hub_to_mirror(name, load_hub(name, split).to_list(), split)


def _rows(columns: dict) -> list[dict]:
    # {"text": [...], "label": [...]} -> [{"text", "label"}, ...] (ARC's choices)
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


@lru_cache(maxsize=1)
def _record_env() -> jinja2.Environment:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    env.filters.update(rows=_rows, zip_dict=lambda keys, values: dict(zip(keys, values)),
                       llamacpp_clean=llamacpp_clean)
    return env


def _hub_to_mirror(name: str, rows: list[dict], split: str) -> list[dict]:
    """Hub records -> the mirror's schema by the set's ``hub.fields`` (none: the Hub's fields are the mirror's)."""
    fields = hub_spec(name).get("fields")
    if not fields:
        return rows
    exprs = {k: (src, _record_env().compile_expression(src, undefined_to_none=False)) for k, src in fields.items()}
    out = []
    for i, row in enumerate(rows):
        rec = {}
        for key, (src, expr) in exprs.items():
            try:
                rec[key] = expr(**row, _split=split)
                if isinstance(rec[key], jinja2.Undefined):
                    str(rec[key])  # StrictUndefined raises here, naming the missing field
            except Exception as err:
                raise DataError(f"dataset {name!r}: Hub record {i} of {hub_ref(name, split)} does not fit "
                                f"{key}: {src!r} ({type(err).__name__}: {err}); its fields: {', '.join(row)}") from err
        out.append(rec)
    return out

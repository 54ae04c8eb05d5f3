"""Arrow schemas of the artifacts that flow between stages (see ``../shared/DESIGN.md``).

Each contract is a :class:`Contract`: the required fields with their exact Arrow types,
optional fields, and groups of alternatives of which at least one must be present (an item
carries its image as encoded bytes, as a path, or as a precomputed feature vector).

Conventions shared by every contract:

* ids are dense ``int64`` (``item_id`` in ``0..N-1``); the source system's id is kept as
  ``raw_item_id``/``raw_user_id`` strings so results can be joined back.
* times are Unix seconds as ``int64`` (``ts``, ``hist_ts``); ``created_at`` is an Arrow
  ``timestamp[s]`` because it is a calendar fact of the item, used for cold-start buckets.
* behaviour lists are oldest first, most recent last, and the three ``hist_*`` lists of a
  row have equal length.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import pyarrow as pa

FLOAT_VECTOR = pa.list_(pa.float32())


@dataclass(frozen=True)
class Contract:
    """A named Arrow contract: required/optional fields and at-least-one-of groups."""

    name: str
    required: Tuple[pa.Field, ...]
    optional: Tuple[pa.Field, ...] = ()
    one_of: Tuple[Tuple[str, ...], ...] = ()
    doc: Dict[str, str] = field(default_factory=dict)

    @property
    def fields(self) -> Dict[str, pa.Field]:
        return {f.name: f for f in (*self.required, *self.optional)}

    def schema_for(self, names) -> pa.Schema:
        """The schema of a table holding the required fields plus ``names`` (optional ones)."""
        by_name = self.fields
        chosen = [f for f in self.required] + [by_name[n] for n in names
                                                if n in by_name and n not in self.required_names]
        return pa.schema(chosen)

    @property
    def required_names(self) -> Tuple[str, ...]:
        return tuple(f.name for f in self.required)


ITEMS = Contract(
    name="items",
    required=(
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("raw_item_id", pa.string(), nullable=False),
        pa.field("category_id", pa.int32(), nullable=False),
        pa.field("title", pa.string(), nullable=False),  # read up to encoders.text.max_length tokens
        pa.field("created_at", pa.timestamp("s"), nullable=False),
    ),
    optional=(
        pa.field("image", pa.binary()),           # encoded PNG/JPEG bytes
        pa.field("image_path", pa.string()),      # or a path, relative to the file's folder (or absolute)
        pa.field("image_feature", FLOAT_VECTOR),  # or a precomputed image feature (no pixels)
        pa.field("brand_id", pa.int32()),
        pa.field("price", pa.float32()),
    ),
    one_of=(("image", "image_path", "image_feature"),),
)

PAIRS = Contract(
    name="pairs",
    required=(
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("signal", pa.string(), nullable=False),  # "purchase" | "click"
        pa.field("category_id", pa.int32(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
    ),
    optional=(
        pa.field("query_image", pa.binary()),
        pa.field("query_image_path", pa.string()),
        pa.field("query_feature", FLOAT_VECTOR),
        pa.field("user_id", pa.int64()),
    ),
    one_of=(("query_image", "query_image_path", "query_feature"),),
)

SIGNALS = ("purchase", "click")

EVENTS = Contract(
    name="events",
    required=(
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("query", pa.string(), nullable=False),  # query text ("" when none)
        pa.field("target_item_id", pa.int64(), nullable=False),
        pa.field("label", pa.int8(), nullable=False),
        pa.field("ts", pa.int64(), nullable=False),
        pa.field("hist_item_ids", pa.list_(pa.int64()), nullable=False),
        pa.field("hist_category_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("hist_ts", pa.list_(pa.int64()), nullable=False),
    ),
    optional=(
        pa.field("position", pa.int16()),  # rank in the result page, when known
        pa.field("raw_user_id", pa.string()),
    ),
)

HISTORY_FIELDS = ("hist_item_ids", "hist_category_ids", "hist_ts")

# The representation center's table: one row per item, fp32/fp16 vectors or row-wise
# quantised int8 (vector * scale + bias per row).
MM_TABLE_FP = Contract(
    name="mm_table",
    required=(
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("vector", FLOAT_VECTOR, nullable=False),
    ),
)
MM_TABLE_INT8 = Contract(
    name="mm_table_int8",
    required=(
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("vector", pa.list_(pa.int8()), nullable=False),
        pa.field("scale", pa.float32(), nullable=False),
        pa.field("bias", pa.float32(), nullable=False),
    ),
)

CONTRACTS = {c.name: c for c in (ITEMS, PAIRS, EVENTS, MM_TABLE_FP, MM_TABLE_INT8)}

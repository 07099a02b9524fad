"""The on-disk trace format: a versioned contract with explicit dtypes.

A trace is a folder:

    manifest.json                      what was captured and which shards are committed (see manifest.py)
    routing/part-00000.parquet         one row per (sequence, position, MoE layer)
    tokens/part-00000.parquet          one row per (sequence, position)
    sequences/part-00000.parquet       one row per sequence

A shard is one `part-NNNNN` in each of the three tables and always holds whole sequences. Inside a
routing part, rows are ordered by (layer, seq_id, pos) and every MoE layer covers the same tokens, so
a shard is a dense [L, T, k] block (see ShardData). Token ids live in `tokens` rather than in every
routing row: they would otherwise be repeated once per layer.
"""

import pyarrow as pa

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: slots in the order the experts received them, reordered when read
TABLES = ("routing", "tokens", "sequences")


def routing_schema(top_k: int, n_router_outputs: int = 0, lookahead_k: int = 0, expert_norms_k: int = 0) -> pa.Schema:
    """Schema of routing parts; `n_router_outputs` > 0 adds the full router output per row,
    `lookahead_k` > 0 the experts layer l+1's router picks from layer l's router input (-1 on the last layer),
    and `expert_norms_k` > 0 the L2 norm of each chosen expert's own output, per slot (for REAP scores).

    Floats are stored as float32 (which every Parquet reader, DuckDB included, understands) holding
    values rounded to the capture's precision (float16 by default, see manifest `weights_dtype`): the
    unused low mantissa bytes are zero and cost almost nothing after byte-stream-split + zstd.
    """
    fields = [
        pa.field("seq_id", pa.int32(), nullable=False),
        pa.field("pos", pa.int32(), nullable=False),
        pa.field("layer", pa.int16(), nullable=False),  # MoE-layer index (0..L-1), not decoder index
        pa.field("topk_ids", pa.list_(pa.int16(), top_k), nullable=False),
        pa.field("topk_weights", pa.list_(pa.float32(), top_k), nullable=False),
    ]
    if n_router_outputs:
        fields.append(pa.field("router_output", pa.list_(pa.float32(), n_router_outputs), nullable=False))
    if lookahead_k:
        fields.append(pa.field("next_layer_prediction", pa.list_(pa.int16(), lookahead_k), nullable=False))
    if expert_norms_k:
        fields.append(pa.field("expert_norms", pa.list_(pa.float32(), expert_norms_k), nullable=False))
    return pa.schema(fields)


TOKENS_SCHEMA = pa.schema(
    [
        pa.field("seq_id", pa.int32(), nullable=False),
        pa.field("pos", pa.int32(), nullable=False),
        pa.field("token_id", pa.int32(), nullable=False),
        pa.field("generated", pa.bool_(), nullable=False),  # False: prompt token, True: produced by --generate
        pa.field("output_entropy", pa.float32()),  # entropy (nats) of the model's next-token distribution; null if not recorded
    ]
)

SEQUENCES_SCHEMA = pa.schema(
    [
        pa.field("seq_id", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # corpus name, e.g. "humaneval"
        pa.field("domain", pa.string(), nullable=False),  # "code" | "math" | "prose" | user label
        pa.field("doc_id", pa.string(), nullable=False),  # id of the document within its source
        pa.field("n_tokens", pa.int32(), nullable=False),
        pa.field("text_sha1", pa.string(), nullable=False),
    ]
)


OPTIONAL_COLUMNS = ("router_output", "next_layer_prediction", "expert_norms")


def schema_problem(table: str, schema: pa.Schema, *, some_columns: bool = False) -> str | None:
    """Why `schema` (of a part, or of `some_columns` read from it) is not one of `table`'s, or None.

    Every column present must have the type this version writes (routing's list columns fixed-size lists,
    `topk_ids` and `topk_weights` of one size); unless `some_columns`, every required column must be there.
    """
    if table == "routing":
        k = schema.field("topk_ids").type.list_size if "topk_ids" in schema.names and \
            pa.types.is_fixed_size_list(schema.field("topk_ids").type) else 1
        widths = {name: schema.field(name).type.list_size for name in OPTIONAL_COLUMNS
                  if name in schema.names and pa.types.is_fixed_size_list(schema.field(name).type)}
        expected = routing_schema(k, widths.get("router_output", 0), widths.get("next_layer_prediction", 0),
                                  widths.get("expert_norms", 0))
    else:
        expected = {"tokens": TOKENS_SCHEMA, "sequences": SEQUENCES_SCHEMA}.get(table)
        if expected is None:
            return f"unknown table {table!r}"
    missing = [name for name in expected.names if name not in schema.names and name not in OPTIONAL_COLUMNS]
    if missing and not some_columns:
        return f"a {table} part without column(s) {', '.join(missing)}"
    for field in schema:
        if field.name not in expected.names:
            return f"unexpected column {field.name!r} in a {table} part"
        if not field.type.equals(expected.field(field.name).type):
            return f"column {field.name!r} is {field.type}, expected {expected.field(field.name).type}"
    return None

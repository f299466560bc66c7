"""The transformers engine: batched prefill and decode with a pluggable KV policy."""

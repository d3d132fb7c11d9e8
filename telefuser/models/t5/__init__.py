"""umT5-XXL text encoder (Wan's text encoder) and its tokenizer."""

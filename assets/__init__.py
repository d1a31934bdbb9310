"""The course's small pretrained models, shipped with the package as data.

Each folder (story-model/, byte-model/) holds model.safetensors, config.json,
tokenizer.tiktoken, card.json and README.md; `make assets` (make_assets.py) writes them and
`llama3_mini.checkpoint.load_pretrained(name)` reads them."""

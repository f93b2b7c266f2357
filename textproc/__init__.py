"""Text in and out of a model, torch-free: tokenizers, chat templates, and the tokenizer and
chat template that a GGUF file carries in its metadata. The router and the engine both import
this package (the router never imports the engine or torch)."""

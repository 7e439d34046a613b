"""Training under a memory budget: the loop (`loop.train`, exported as `memfit.train`), memory-lean
optimizers (`optim`), LoRA on plain and quantized layers (`lora`), background checkpoints
(`checkpoint`), DDP/FSDP2 processes (`distributed`) and the data order (`data`)."""

"""Moving models between this framework and the released Würstchen v2 / diffusers (the optional ``interop`` extra:
diffusers, transformers, peft). Nothing here is imported by training unless asked for."""

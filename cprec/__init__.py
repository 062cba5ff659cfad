"""cprec: CpRec compression of NextItNet sequential recommenders in JAX/Flax."""

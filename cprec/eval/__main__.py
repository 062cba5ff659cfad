"""python -m cprec.eval RUN [--source best|checkpoints] [--step S] [--splits val test]: see cprec/eval/eval_run.py."""
from cprec.eval.eval_run import main

main()

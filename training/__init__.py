"""How the shipped tiny models are trained and measured — part of the repository, not of the installed package.

    architectures.py  the four shipped architectures as configs
    train.py          the deterministic training script (python -m training.train --model NAME)
    router_tap.py     router logits and chosen ids during training and evaluation
    debian_docs.py    training-only prose from Debian documentation packages
    math_mix.py       the training math stream: GSM diluted with other reasoning-gym puzzles
    evaluate.py       perplexity per domain (python -m training.evaluate --model all)
    targets.py        the routing targets, measured with moescope's own capture + analyze

Run from the repository root; `moescope` itself never imports this folder.
"""

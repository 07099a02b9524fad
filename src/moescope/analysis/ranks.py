"""The two ranks an LRU pass gives that are not stack distances (stack_distance.py and its compiled loop, compiled.py)."""

NO_PRIOR_USE = -1  # rank of a touch whose expert was not touched earlier in the sequence (compulsory miss)
NOT_AN_EXPERT = -2  # rank of a slot that holds no real expert, or repeats an earlier column of its batch

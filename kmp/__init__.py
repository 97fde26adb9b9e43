"""kmp: a Keras 3 mixed-precision training kit."""

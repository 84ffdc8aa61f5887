"""Operators, one folder each: reference, kernels, autograd, public function."""

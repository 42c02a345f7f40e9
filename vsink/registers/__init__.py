"""Registers: trained register slots on any backbone, register-neuron discovery and test-time
registers (Jiang et al. 2025)."""

from ..backbones.base import Backbone
from .neurons import NeuronSpec, RegisterNeuron, find_register_neurons
from .test_time import TestTimeRegisters


def add_registers(backbone: Backbone, n: int = 4, *, init_std: float = 1e-6, seed: int = 0) -> Backbone:
    """A copy of ``backbone`` with ``n`` learnable registers (see :meth:`Backbone.with_registers`)."""
    return backbone.with_registers(n, init_std=init_std, seed=seed)


__all__ = ["NeuronSpec", "RegisterNeuron", "TestTimeRegisters", "add_registers", "find_register_neurons"]

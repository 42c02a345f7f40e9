"""Training-free fixes: register-neuron discovery and test-time registers (Jiang et al. 2025)."""

from .neurons import NeuronSpec, RegisterNeuron, find_register_neurons
from .test_time import TestTimeRegisters

__all__ = ["NeuronSpec", "RegisterNeuron", "TestTimeRegisters", "find_register_neurons"]

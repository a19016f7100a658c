"""How workers talk: one Communicator interface, several backends, the tiled AllReduce."""

from collectives.base import Communicator, Handle, SingleRankCommunicator

__all__ = ["Communicator", "Handle", "SingleRankCommunicator"]

"""Protection methods, one module each, behind one interface (see ``base``)."""
from ue_dist.methods.base import (Method, StateError, build_method, get_method, load_state,
                                  method_names, register, save_state)

__all__ = ["Method", "StateError", "build_method", "get_method", "load_state", "method_names",
           "register", "save_state"]

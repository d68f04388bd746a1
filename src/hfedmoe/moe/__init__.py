from hfedmoe.moe.access import MoEAccess, NoMoELayersError, ParamGroups, make_access

__all__ = ["MoEAccess", "NoMoELayersError", "ParamGroups", "make_access"]

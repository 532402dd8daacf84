"""The base every package stands on: how a setting is checked, how conf/ is composed, its resolvers.

    checks     the one check kit: `Node` dataclasses whose fields carry checks (integer, number, choice, ...)
    compose    composing conf/ outside @hydra.main; `settings_for(<Settings class>, overrides)`
    resolvers  conf/hydra's resolvers: ${lab.run_stamp:} shared by every rank, ${lab.job_gpu:}
    units      byte units (MB, GB, MiB, GiB), one name each
"""

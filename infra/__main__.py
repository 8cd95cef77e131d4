"""mlseg on DigitalOcean: Prefect worker droplets, their network, storage and registry.

Only wiring: settings come from `pulumi.Config`, resources from the builders in mlseg_infra.
"""

import pulumi
from mlseg_infra.settings import CONFIG_NAMESPACE, read_secrets, read_settings
from mlseg_infra.stack import build_stack

config = pulumi.Config(CONFIG_NAMESPACE)
exports = build_stack(read_settings(config, pulumi.get_stack()), read_secrets(config))
for name, value in exports.as_dict().items():
    pulumi.export(name, value)

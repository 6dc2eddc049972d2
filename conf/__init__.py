"""The Hydra configs of ``daskadmm`` (installed as the package ``daskadmm.conf``).

Every default lives in the dataclasses of ``daskadmm/config.py``; ``config.yaml`` composes them
first (the ``base_config`` node), and each group file lists only what differs. Hydra imports this
package to read the files, which registers that node.
"""

from daskadmm.cli import register_schema

register_schema()

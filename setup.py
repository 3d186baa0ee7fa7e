"""pip builds: ship config/ (action vocabulary, node parameters) inside the vla_node package.

In the source tree and in a colcon install, config/ sits next to the package (or in the
share directory); a wheel has neither, so it carries a copy at vla_node/config/.
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfig(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "vla_node" / "config"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(Path(__file__).resolve().parent.joinpath("config").glob("*.yaml")):
            shutil.copy2(source, target / source.name)


setup(cmdclass={"build_py": BuildPyWithConfig})

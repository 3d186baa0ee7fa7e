# Source me (bash): the venv, ROS 2 from the wheels, and this package's colcon install.
# Used by the Makefile for every command after set-up.
_vla_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
set +u
source "$_vla_repo/.venv/bin/activate"
export AMENT_PREFIX_PATH="$_vla_repo/.venv${AMENT_PREFIX_PATH:+:$AMENT_PREFIX_PATH}"
export CMAKE_PREFIX_PATH="$_vla_repo/.venv${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}"
source "$_vla_repo/install/setup.bash"
export RMW_IMPLEMENTATION="${RMW_IMPLEMENTATION:-rmw_fastrtps_cpp}"
# Nothing is ever fetched from a model hub: every model is local.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
unset _vla_repo

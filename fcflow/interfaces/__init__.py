"""nipype adapters: thin SimpleInterfaces over fcflow's science functions."""

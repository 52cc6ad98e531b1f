"""Capacity that follows the work: provisioners (local processes, EC2), the scaling
policy, the user-data renderer, and a cloud simulation (moto + sandboxes) for tests."""

"""The test bed the tests, the benches and the demo share: real guests and workers on libvirtd
(``e2e``), fake hosts for workflow logic (``fake_host``), simulated fleets (``fleet``), instances on
libvirt's test driver (``libvirt_test_driver``), the real Debian guest's helpers (``real_guest``)."""

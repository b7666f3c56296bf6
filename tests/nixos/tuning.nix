# Boots with the module's host tuning and checks the kernel took it.
{
  name = "oxidize-relay-kernel-tuning";

  nodes.machine = {
    virtualisation = {
      cores = 4;
      vlans = [ 1 ];
    };
    services.oxidize-relay = {
      enable = true;
      hugepages = {
        size = "2M";
        count = 64;
      };
      cpu = {
        workerCores = [ 2 ];
        housekeepingCores = [ 0 1 ];
      };
      busyPoll = 50;
      settings = {
        runtime.mode = "af_xdp";
        interface = [{ name = "eth1"; role = "both"; }];
        route = [{ listen = "192.168.1.1:5000"; upstreams = [ "192.168.1.9:7000" ]; }];
      };
    };
  };

  testScript = ''
    machine.wait_for_unit("oxidize-relay.service")
    cmdline = machine.succeed("cat /proc/cmdline")
    for param in ["hugepagesz=2M", "hugepages=64", "isolcpus=managed_irq,domain,2", "nohz_full=2", "rcu_nocbs=2", "irqaffinity=0,1"]:
        assert param in cmdline.split(), f"{param} missing from {cmdline}"
    machine.succeed("grep -q '^HugePages_Total: *64$' /proc/meminfo")
    assert machine.succeed("cat /sys/devices/system/cpu/isolated").strip() == "2"
    assert machine.succeed("sysctl -n net.ipv4.ip_local_reserved_ports").strip() == "20000-29999"
    assert machine.succeed("sysctl -n net.core.busy_poll").strip() == "50"
    pid = machine.succeed("systemctl show -p MainPID --value oxidize-relay.service").strip()
    worker = machine.succeed(f"grep -l '^oxr-worker-0$' /proc/{pid}/task/*/comm").strip().rsplit("/", 1)[0]
    assert machine.succeed(f"grep Cpus_allowed_list {worker}/status").split()[-1] == "2", "worker 0 pinned to core 2"
  '';
}

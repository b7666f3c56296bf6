# Puts the scenario scripts and their tools on every test VM as `oxr-scenario`
# (run.py with the packaged relay) and `oxr-peer` (peer.py).
{ config, pkgs, ... }:

let
  scenarios = ../scenarios;
  # clang (unwrapped: no hardening flags for the BPF target) builds the one-arm topology's
  # RSS-emulating tc program against the kernel headers named in OXR_BPF_INCLUDE.
  tools = [ pkgs.python3 pkgs.iproute2 pkgs.ethtool pkgs.iputils pkgs.libcap pkgs.procps pkgs.llvmPackages.clang-unwrapped ];
  bpfInclude = "export OXR_BPF_INCLUDE=${pkgs.linuxHeaders}/include\n";
in
{
  environment.systemPackages = tools ++ [
    (pkgs.writeShellApplication {
      name = "oxr-scenario";
      runtimeInputs = tools;
      text = bpfInclude + ''exec python3 ${scenarios}/run.py --relay ${config.services.oxidize-relay.package}/bin/oxidize-relay "$@"'';
    })
    (pkgs.writeShellApplication {
      name = "oxr-peer";
      runtimeInputs = tools;
      text = ''exec python3 ${scenarios}/peer.py "$@"'';
    })
  ];
  virtualisation.memorySize = 2048;
}

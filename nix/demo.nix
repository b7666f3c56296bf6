{ writeShellApplication
, oxidize-relay
, python3
, iproute2
, ethtool
, iputils
}:

writeShellApplication {
  name = "oxidize-relay-demo";
  runtimeInputs = [ python3 iproute2 ethtool iputils ];
  text = ''
    exec python3 ${../tests/scenarios}/run.py --relay ${oxidize-relay}/bin/oxidize-relay demo "$@"
  '';
}

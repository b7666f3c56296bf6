{
  description = "Oxidize relay: a kernel-bypass UDP relay (XDP + AF_XDP) with a NixOS module and an appliance image";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs = { self, nixpkgs }:
    let
      system = "x86_64-linux";
      pkgs = nixpkgs.legacyPackages.${system};
      oxidize-relay = pkgs.callPackage ./nix/package.nix { };
    in
    {
      packages.${system} = {
        default = oxidize-relay;
        inherit oxidize-relay;
        iso = self.nixosConfigurations.appliance-iso.config.system.build.isoImage;
      };

      apps.${system}.demo = {
        type = "app";
        program = "${pkgs.callPackage ./nix/demo.nix { inherit oxidize-relay; }}/bin/oxidize-relay-demo";
      };

      nixosModules = {
        default = { pkgs, lib, ... }: {
          imports = [ ./nixos/module.nix ];
          services.oxidize-relay.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        };
        # The appliance without a site: add a module setting `oxidize-relay.appliance` (see nixos/site.nix).
        appliance = ./nixos/appliance.nix;
      };

      # Built from nixos/site.nix: fill it in first (the build names what is missing).
      nixosConfigurations = {
        appliance = nixpkgs.lib.nixosSystem {
          inherit system;
          modules = [ self.nixosModules.default ./nixos/appliance.nix ./nixos/site.nix ./nixos/appliance-disk.nix ];
        };
        appliance-iso = nixpkgs.lib.nixosSystem {
          inherit system;
          modules = [
            self.nixosModules.default
            ./nixos/appliance.nix
            ./nixos/site.nix
            ./nixos/appliance-iso.nix
            "${nixpkgs}/nixos/modules/installer/cd-dvd/installation-cd-minimal.nix"
          ];
        };
      };

      checks.${system} = import ./nix/checks.nix { inherit pkgs self oxidize-relay; };

      devShells.${system}.default = pkgs.callPackage ./nix/shell.nix { inherit oxidize-relay; };

      formatter.${system} = pkgs.nixpkgs-fmt;
    };
}

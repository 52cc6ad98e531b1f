# Packer template for a zfalkon worker AMI (Debian 12, amd64).
#
# Written for Packer 1.6.6 (Debian bookworm), which has the amazon-ebs builder built in.
# Packer >= 1.7 users: see README.md for the required_plugins block.

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "instance_type" {
  type    = string
  default = "t3.small"
}

variable "zfalkon_version" {
  type    = string
  default = "0.1.0"
}

variable "zfalkon_wheel_url" {
  type        = string
  default     = ""
  description = "When set, install zfalkon from this wheel URL instead of PyPI."
}

variable "ami_name_prefix" {
  type    = string
  default = "zfalkon-worker"
}

locals {
  timestamp = formatdate("YYYYMMDDhhmmss", timestamp())
}

source "amazon-ebs" "worker" {
  region        = var.region
  instance_type = var.instance_type
  ssh_username  = "admin"
  ami_name      = "${var.ami_name_prefix}-${var.zfalkon_version}-${local.timestamp}"

  source_ami_filter {
    owners      = ["136693071363"] # Debian
    most_recent = true
    filters = {
      name                = "debian-12-amd64-*"
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
  }

  tags = {
    Name              = "${var.ami_name_prefix}-${var.zfalkon_version}"
    zfalkon-version   = var.zfalkon_version
    base-distribution = "debian-12"
  }
}

build {
  sources = ["source.amazon-ebs.worker"]

  provisioner "file" {
    source      = "${path.root}/../bootstrap/zfalkon-worker.service"
    destination = "/tmp/zfalkon-worker.service"
  }

  provisioner "shell" {
    script          = "${path.root}/provision.sh"
    execute_command = "chmod +x {{ .Path }}; sudo -E {{ .Vars }} {{ .Path }}"
    environment_vars = [
      "ZFALKON_VERSION=${var.zfalkon_version}",
      "ZFALKON_WHEEL_URL=${var.zfalkon_wheel_url}",
    ]
  }
}

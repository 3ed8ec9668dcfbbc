# The colour app's mesh, as a team kept it in Terraform: inputs and names shared by main.tf.

variable "env" {
  description = "Deployment stage, part of every name."
  type        = string
  default     = "prod"
}

variable "app_port" {
  type    = number
  default = 8080
}

variable "namespace" {
  type    = string
  default = "colors.local"
}

variable "red_weight" {
  type    = number
  default = 1
}

# No default: supplied at plan time, so it cannot be read offline.
variable "gateway_cert_arn" {
  type = string
}

locals {
  mesh_name   = "colorapp-${var.env}"
  gateway     = "${local.mesh_name}-ingress"
  color_host  = "colorteller.${var.namespace}"
  common_tags = { team = "colors", stage = var.env }
}

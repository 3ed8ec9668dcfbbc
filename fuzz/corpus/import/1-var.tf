variable "x" { default = "v" }
locals { n = "${var.x}-n" }
resource "aws_appmesh_virtual_router" "r" {
  name = local.n
  mesh_name = "m"
  spec {}
}

"""Exports of a Project to other systems, one module per target; each is pure (Project -> text).

    cronjob    Kubernetes CronJob running `capsule pipeline run` on schedule.cron
    airflow    Apache Airflow 3 DAG doing the same
    github     GitHub Actions workflow, `on: schedule`
    ci         CI workflows (GitHub Actions, GitLab CI): test stage on every push, pipeline on main
    k8s_serve  Kubernetes Deployment + Service + HorizontalPodAutoscaler for `capsule serve`
    compose    docker-compose file: dev box, service, MLflow server
"""
